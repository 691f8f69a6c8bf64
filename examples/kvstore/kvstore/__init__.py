"""
A line-based key-value service, served by maccept as the protocol plugin
C{kv}.  Keys live as files in one directory, so every worker sees what any
worker stored.

Commands, one per line (CRLF or LF)::

    SET key value     ->  OK
    GET key           ->  VALUE value   or  NOT_FOUND
    DEL key           ->  DELETED       or  NOT_FOUND
    anything else     ->  ERROR <why>
"""
