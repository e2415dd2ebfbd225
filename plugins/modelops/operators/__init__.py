"""Operators: thin ``execute()`` methods that delegate to stage functions and hooks."""
