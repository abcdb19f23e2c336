-- A ledger row's description is for people: at most 1,000 characters (hostile or careless callers
-- once could store megabytes per row). Enforced by the table, so every writer -- the functions' fast
-- and slow paths, the app through RPC -- gets the same refusal (SQLSTATE 23514, translated by the
-- ledger module to InvalidArgument). NOT VALID: rows written before stay as they are (append-only).
ALTER TABLE public.points_transactions
    ADD CONSTRAINT points_transactions_description_length CHECK (length(description) <= 1000) NOT VALID;
