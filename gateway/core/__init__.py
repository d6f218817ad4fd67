"""The domain: plain Python that the pages, the API, the admin commands and the
workers all call (models, state moves, intake, storage, the airlock, accounts,
provenance, the one reader of job files, the submission's workflow). Nothing
here handles a request; nothing here imports gateway.web or jobs."""
