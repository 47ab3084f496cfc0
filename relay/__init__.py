"""virt-relay: store-and-forward relay between libvirt hosts and an AMQP 1.0 broker."""

__version__ = "0.1.0"
