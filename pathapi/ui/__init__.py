"""See what is stored: the storage browser (``pathapi ui``) and the CLI views (``pathapi ls``,
``log``, ``diff``, ``cat``), both read-only, both over one query module.

- :mod:`.catalog` the queries: works, Paths, versions, transfers, trees, previews, diffs;
- :mod:`.chunkio` bytes of a stored file read from its chunks (ranges, streams, tars);
- :mod:`.safetensors` a tensor table from a file's header alone, and which tensors changed;
- :mod:`.server` the aiohttp server (token, routes, live updates); :mod:`.pages` its HTML;
- :mod:`.views` the command line's text and ``--json``.

The pictures in docs/ui/ come from the browser tests:
``PATHAPI_UI_SCREENSHOTS=docs/ui pytest tests/test_ui_browser.py``.
"""
