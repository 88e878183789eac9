"""The call as data: the pure state machine (:mod:`.call`) and its typed events
(:mod:`.events`). No I/O, no media, no service: inputs in, events and actions out."""
