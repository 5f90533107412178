"""Dispatcher selection: the skill card, the availability gate, hardware detection."""
