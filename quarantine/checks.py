import os

from django.conf import settings
from django.core.checks import Error, register


@register()
def check_store_writable(app_configs, **kwargs):
    root = settings.QUARANTINE_DIR
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return [Error(f"QUARANTINE_DIR {root} cannot be created: {exc}", id="quarantine.E001")]
    if not os.access(root, os.W_OK | os.X_OK):
        return [Error(f"QUARANTINE_DIR {root} is not writable", id="quarantine.E002")]
    return []
