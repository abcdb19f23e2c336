-- Demo seed bookkeeping (issue 3, demo part): what `credits seed` injected, so that tests, the demo and
-- the Dagster job can compare what the audit found against what was planted.
--
-- Only the seed writes these tables; they stay empty in a real database. The seed itself writes the
-- five contract tables the way the app does (ledger rows through add_points/deduct_points), see
-- checks/seed.py.

-- One row per seeding run: the parameters that reproduce it.
CREATE TABLE public.demo_seed_runs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    users       integer NOT NULL CHECK (users >= 0),
    fault_rate  double precision NOT NULL CHECK (fault_rate >= 0 AND fault_rate <= 1),
    seed        bigint NOT NULL,
    anchor      timestamptz NOT NULL,           -- the "now" the periods were laid out around
    mode        text NOT NULL CHECK (mode IN ('functions', 'bulk')),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Injected faults: the rule that must find each user (contract rule ids), and which variant of the
-- fault was planted (e.g. duplicate_grants/retry_key_spent, which a person has to resolve).
CREATE TABLE public.demo_seed_manifest (
    rule              text NOT NULL,
    bestauth_user_id  uuid NOT NULL,
    variant           text NOT NULL DEFAULT '',
    PRIMARY KEY (rule, bestauth_user_id)
);

-- Healthy users planted to look like faults (spent-all, renewed, canceled, ...): no rule may flag them.
CREATE TABLE public.demo_seed_lookalikes (
    category          text NOT NULL,
    bestauth_user_id  uuid NOT NULL,
    PRIMARY KEY (category, bestauth_user_id)
);
