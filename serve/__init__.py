"""The ``deepaudit serve`` web application: :mod:`.app` puts the pages together (one
router module per page: ``runs_page``, ``items_page``, ``export``, ``item_page``,
``review_page``, ``check_page``) over one data layer (:mod:`.data`), with the guard in
:mod:`.security` and uvicorn's settings in :mod:`.server`. The command is
``jobs/serve_cmd.py``. Needs ``pip install 'deepaudit[serve]'``; see docs/serve.md."""
