"""ztick-tw: a push-driven, time-based job scheduler daemon on Twisted, compatible with ztick."""

__version__ = "0.1.0"
