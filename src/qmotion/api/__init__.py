"""Wire models of qmotion's HTTP APIs, shared by the services that serve them and the client."""
