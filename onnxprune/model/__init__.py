"""The ground floor: the only code that reads and edits ``onnx.ModelProto`` (``proto``: constants,
initializers, node names, copies; ``external``: external data; ``inline``: large self-contained files;
``load`` and ``save``) and the only code that reads onnx-graphsurgeon graphs' internals (``graph``).
Everything above reads models through it."""
