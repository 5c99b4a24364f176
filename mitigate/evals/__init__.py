"""Evaluation suite: POPE and CHAIR on COCO-format data; batched, resumable, shardable runs; reports.

Modules, in the order data flows:

- ``coco``: COCO annotations and images by id (pycocotools), ``--coco-root`` or ``builtin:sample``;
- ``pope``, ``chair`` (with ``synonyms`` and ``words``): question building, parsers, matching, metrics;
- ``tasks``: the task registry (build docs, prompt, process an answer, aggregate);
- ``runner`` (with ``cache`` and ``parallel``): batched greedy generation into a JSON-lines cache;
- ``evaluate``: one run into a run folder; ``results``: its files;
- ``trihe`` (with ``judge``): Tri-HE, claims extracted and judged by a chat endpoint or a local NLI model;
- ``score``: scoring answers from anywhere; ``bootstrap`` and ``report``: comparing runs;
- ``compare``: vanilla and every method on one model under one protocol, one table;
- ``cli``: ``mitigate eval|score|report`` (``register(app)``), also ``python -m mitigate.evals``.

Only CHAIR (nltk, textblob), Tri-HE's judge client (httpx) and the plots (matplotlib) need the ``[evals]``
extras.
"""
