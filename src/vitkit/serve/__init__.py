"""Serving: many tasks from one trunk over HTTP (`vitkit serve`), dynamically batched per task.

`TaskSet` (tasks.py) holds the base checkpoint once and each task's delta; `TaskBatcher`
(batcher.py) batches each task's requests; `create_app` (app.py) is the FastAPI app; the Ray Serve
deployment is in `vitkit.serve.ray_serve` (imported on its own: it needs `ray`). The HTTP
layer needs the `serve` extra: `pip install 'vitkit[serve]'`.

FastAPI + uvicorn with a small asyncio batcher rather than LitServe: batching has to be per task
(tasks differ in resolution and head), decoding must run before a request joins a batch (so a bad
upload fails alone), and the trunk must live once in the process that answers; LitServe batches all
requests of an endpoint together and runs inference in worker processes of its own.
"""

from vitkit.serve.batcher import TaskBatcher
from vitkit.serve.tasks import BASE_TASK, Task, TaskSet, UnknownTaskError, parse_task_specs, top_k

__all__ = ["BASE_TASK", "Task", "TaskBatcher", "TaskSet", "UnknownTaskError", "parse_task_specs", "top_k"]
