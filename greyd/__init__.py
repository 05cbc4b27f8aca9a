"""greyd: a greylisting SMTP proxy in front of a host's real MTA."""

__version__ = "0.1.0"
