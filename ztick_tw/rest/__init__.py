"""The REST API of SPEC §7: an HTTP view of :class:`~ztick_tw.operations.Operations`.

``http11`` is the HTTP/1.1 framing (on ``httptools``: bounds, pipelining, back-pressure,
idle time), ``resource`` maps paths and methods onto one operation each, ``bodies`` turns
JSON into operation arguments and answers into JSON, ``site`` puts them together, and
``openapi`` is the document served at ``/openapi.json``.
"""

from ztick_tw.rest.site import rest_site

__all__ = ["rest_site"]
