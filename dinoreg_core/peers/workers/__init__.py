"""Scripts the peer methods run in their own Python environments (no dinoreg import there); see peers/_worker.py."""
