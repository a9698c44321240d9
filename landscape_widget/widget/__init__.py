"""The live widget: anywidget front end, message protocol and worker thread."""

from .protocol import ProtocolError, Spec, parse_message, parse_spec
from .widget import LandscapeWidget
from .worker import Worker

__all__ = ["LandscapeWidget", "Worker", "Spec", "ProtocolError", "parse_message", "parse_spec"]
