//! Celery task messages (protocol v2): build and parse them, send tasks Celery workers run.
