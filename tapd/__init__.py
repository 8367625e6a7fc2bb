"""tapd: hands bridged tap devices to unprivileged virtual machine monitors."""

__version__ = "0.1.0"

#: Bumped only when a change to the wire protocol would break an existing client.
PROTOCOL_VERSION = 1
