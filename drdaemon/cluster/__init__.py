"""The cluster engine: scheduling and work through a PostgreSQL job queue (procrastinate).

`plan` decides (pure: which jobs, under which locks and queues), `queue` talks to the
engine (the adapter: schema, deferring, stalled jobs, the queue's counts), `tasks` are the
job functions a worker runs (the same services the single-host daemon calls), `daemon`
wires them: the scheduler of `drdaemon run` and the worker of `drdaemon worker`.
"""
