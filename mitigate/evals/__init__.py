"""Evaluation suite: POPE and CHAIR on COCO-format data; batched, resumable, shardable runs; reports.

Modules, in the order data flows:

- ``coco``: COCO annotations and images by id (pycocotools), ``--coco-root`` or ``builtin:sample``;
- ``pope``, ``chair`` (with ``synonyms`` and ``words``): question building, parsers, matching, metrics;
- ``tasks``: the task registry (build docs, prompt, process an answer, aggregate);
- ``runner`` (with ``cache`` and ``parallel``): batched greedy generation into a JSON-lines cache;
- ``evaluate``: one run into a run folder; ``results``: its files;
- ``score``: scoring answers from anywhere; ``bootstrap`` and ``report``: comparing runs;
- ``cli``: ``mitigate eval|score|report`` (``register(app)``), also ``python -m mitigate.evals``.

Only CHAIR (nltk, textblob) and the report's plot (matplotlib) need the ``[evals]`` extras.
"""
