"""The domain: rules, state moves, database work and files on disk that pages, API, commands and workers call."""
