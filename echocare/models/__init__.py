"""The model core: EchoCare encoder configs and checkpoints (:mod:`.encoder`), task heads
(:mod:`.heads`) and the task-model checkpoint format (:mod:`.task_model`).

Nothing is imported here, so ``import echocare.models`` stays torch-free.
"""
