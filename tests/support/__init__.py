"""Test helpers shared by the test folders (on the test path: `from support.nodes import ...`)."""
