"""Test-only start-up hook: every vmdr process the test suite starts (CLI subprocesses,
pseudo-terminal runs) creates key slots with ``KdfParams.for_tests()``.

tests/conftest.py puts this directory first on ``PYTHONPATH``; nothing installs it, and
vmdr itself has no switch for it. The system's own sitecustomize (Debian: the apport hook)
is replaced only in those test processes.
"""

import vmdr_test_kdf

vmdr_test_kdf.install()
