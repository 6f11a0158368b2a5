"""The record of truth: the SQL tables (`models`), engines, sessions and migrations (`db`, `migrations/`),
the fenced compare-and-set reads and writes of the job table (`store`), a job's event stream (`streams`),
named leases (`locks`) and deleting what is past retention (`retention`)."""
