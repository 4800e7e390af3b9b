"""Wire models of qmotion's HTTP APIs, shared by the services that serve them and the client.

The ground floor: imports nothing of qmotion but the root errors, so that every layer can use
it (an enum both the API and a pure engine need lives here, not in the engine).
"""
