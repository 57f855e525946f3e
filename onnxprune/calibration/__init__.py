"""Calibration on ONNX Runtime: the data (``data``), where each block's output projection is (``sites``),
and the one instrumented session that the calibrated importance methods and compensation share
(``session``)."""
