"""The library: data (sources, images, shards, loader, views, validation), model (build, optimiser,
schedule, train step), checkpoint I/O, triggers, metrics and the frontier.

It knows no stage: nothing here imports `tasks` (the stages and their params schema) or `flows`
(tests/test_layout.py checks). Functions take plain values or the config object they are handed.
"""
