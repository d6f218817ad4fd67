"""The web app's rooms: one Flask blueprint per area (auth, account, submissions,
exports, review, admin, api, ops, downloads, errors) and the helpers of their
views. Pages call gateway.core for every rule; nothing here is run by a worker."""
