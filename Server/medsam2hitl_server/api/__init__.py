"""The HTTP side of the service: one router per concern, their dependencies, and the errors' HTTP mapping."""
