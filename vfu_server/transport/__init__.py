"""The trio transport: Unix sockets, SCM_RIGHTS fds, and message channels."""

from .channel import MessageChannel
from .unix import SocketPathError, inherited_socket, open_unix_listener, remove_socket

__all__ = ["MessageChannel", "SocketPathError", "inherited_socket", "open_unix_listener", "remove_socket"]
