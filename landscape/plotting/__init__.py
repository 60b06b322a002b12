"""Matplotlib figures: metric timelines (:mod:`.timelines`) and loss surfaces (:mod:`.surfaces`)."""
