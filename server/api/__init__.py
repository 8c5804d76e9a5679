"""REST and websocket handlers: parse, authorise, delegate."""
