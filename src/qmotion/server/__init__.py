"""The manager: cluster inventory, tasks and the REST API the CLI talks to."""
