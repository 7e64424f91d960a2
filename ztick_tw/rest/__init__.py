"""The REST API of SPEC §7: a ``twisted.web`` view of :class:`~ztick_tw.operations.Operations`.

``bodies`` turns JSON into operation arguments and answers into JSON, ``resource`` maps
paths and methods onto one operation each, ``site`` bounds what a client may send (body
size, idle time), ``openapi`` is the document served at ``/openapi.json``.
"""

from ztick_tw.rest.site import rest_site

__all__ = ["rest_site"]
