"""The NATS JetStream backend (`storage.backend = "jetstream"`): DESIGN.md §7, scale-out."""
