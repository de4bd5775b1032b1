"""The ``deepaudit serve`` web application: :mod:`.app` puts the pages together (one
router module per page: ``runs_page``, ``items_page``, ``export``, ``item_page``,
``review_page``, ``check_page``) over one snapshot (:mod:`.data`, with its parts
:mod:`.item_query`, :mod:`.paging`, :mod:`.review_index` and :mod:`.files`), with the guard in
:mod:`.security` and uvicorn's settings in :mod:`.server`. The command is
``jobs/serve_cmd.py``. Needs ``pip install 'deepaudit[serve]'``; see docs/serve.md."""
