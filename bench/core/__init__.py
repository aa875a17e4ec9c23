"""The contract every component and stage shares: registries, component base classes, exchanged types, plugin discovery."""
