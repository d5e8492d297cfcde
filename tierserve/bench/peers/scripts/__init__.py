"""Stand-alone scripts that `bench compare` runs with a peer's own interpreter (a peer's venv, or the project's).

They import nothing from tierserve except ``tierserve_offline.py``, which runs in the project's environment.
Offline scripts read a spec JSON and write a result JSON; the formats are in ``offline_io.py``.
"""
