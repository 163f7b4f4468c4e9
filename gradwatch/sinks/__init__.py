"""Sinks write what gradwatch measured, found and did; rank zero only."""

from gradwatch.sinks.base import Sink
from gradwatch.sinks.console import Console
from gradwatch.sinks.events import EventsFile, read_events
from gradwatch.sinks.summary import build_summary, render_summary
from gradwatch.sinks.tensorboard import TensorBoard, custom_scalars_layout

__all__ = [
    "Console",
    "EventsFile",
    "Sink",
    "TensorBoard",
    "build_summary",
    "custom_scalars_layout",
    "read_events",
    "render_summary",
]
