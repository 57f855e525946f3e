"""Typed errors. The command line turns each into a one-line message and an exit code."""


class OnnxPruneError(Exception):
    """Base class: every error onnxprune raises on purpose is one of these."""

    exit_code = 1


class InputError(OnnxPruneError):
    """The user's input is unusable: a missing file, bytes that are not ONNX, a bad option."""

    exit_code = 2


class MatchError(OnnxPruneError):
    """No attention block could be matched, or a block is not of a supported form."""

    exit_code = 3


class PlanError(OnnxPruneError):
    """The requested pruning cannot be expressed: bad ratio, bad head list, uneven GQA groups."""

    exit_code = 4


class RewriteError(OnnxPruneError):
    """The rewrite failed its own checks; nothing was written."""

    exit_code = 5


class VerifyError(OnnxPruneError):
    """The pruned model does not equal the masked original."""

    exit_code = 6


class OutputError(OnnxPruneError):
    """An output could not be written (a full disk, a read-only folder); nothing was left behind."""

    exit_code = 7


class ModelTypeError(InputError, TypeError):
    """The API was given something that is not a model: not an ``onnx.ModelProto``, a path or bytes."""
