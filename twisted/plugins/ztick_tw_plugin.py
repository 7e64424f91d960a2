"""twistd plugin: ``twistd -n ztick -c etc/ztick.toml``."""

from twisted.application.service import ServiceMaker

ztick = ServiceMaker(
    "ztick-tw",
    "ztick_tw.tap",
    "A push-driven, time-based job scheduler, wire-compatible with ztick.",
    "ztick",
)
