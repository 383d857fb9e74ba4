"""One file per attention method; each registers itself with ``@register`` (see attnzoo.registry)."""
