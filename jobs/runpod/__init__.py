"""Talking to RunPod: the serverless API client (`client`), the management client for endpoints, workers,
pods, the GPU catalog, billing and the balance (`management`), rpq's own request budget shared by every
process (`budget`), and endpoint health collected from /health (`health`).

Nothing is re-exported here: import from the module that defines a name (`from jobs.runpod.client
import RunPodClient`). `jobs.settings` imports `budget`, and `client` imports `jobs.settings`, so a
package that imported `client` on the way to `budget` would import itself in a circle.
"""
