"""alignloop feedback service: labelers rank model answers; versioned export of preference pairs.

Kept light on purpose: importing ``feedback_service`` (or ``feedback_service.client``)
imports neither torch nor the web stack. The app lives in ``feedback_service.app``.
"""

__version__ = "0.1.0"
