"""The built-in model: its network (``model.py``), its trainer (``train.py``) and the ``builtin`` backend."""
