-- credit-recon schema: the five tables of the contract plus the ledger's own bookkeeping.
-- The database enforces what must never break: no negative balance, one write per idempotency
-- key, non-zero signed amounts, an append-only ledger.

CREATE TABLE public.bestauth_users (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email       text NOT NULL UNIQUE CHECK (email = lower(email) AND email LIKE '%_@_%'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE public.user_id_mapping (
    bestauth_user_id  uuid PRIMARY KEY REFERENCES public.bestauth_users (id),
    supabase_user_id  uuid NOT NULL UNIQUE,
    created_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE public.subscriptions_consolidated (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id               uuid NOT NULL UNIQUE REFERENCES public.bestauth_users (id),
    tier                  text NOT NULL CHECK (tier IN ('free', 'pro', 'pro_plus')),
    billing_cycle         text CHECK (billing_cycle IN ('monthly', 'yearly')),
    status                text NOT NULL CHECK (status IN ('active', 'trialing', 'past_due', 'canceled', 'expired')),
    current_period_start  timestamptz,
    current_period_end    timestamptz,
    metadata              jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CHECK (current_period_end IS NULL OR current_period_start IS NULL OR current_period_end > current_period_start)
);
-- period lookups: which paid subscriptions are current, and when they roll over
CREATE INDEX subscriptions_status_period_idx
    ON public.subscriptions_consolidated (status, tier, current_period_start);

CREATE TABLE public.points_balances (
    user_id          uuid PRIMARY KEY,
    balance          bigint NOT NULL DEFAULT 0 CHECK (balance >= 0),
    lifetime_earned  bigint NOT NULL DEFAULT 0 CHECK (lifetime_earned >= 0),
    lifetime_spent   bigint NOT NULL DEFAULT 0 CHECK (lifetime_spent >= 0),
    -- credits held by active reservations (two-phase charges); spendable = balance - reserved
    reserved         bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0 AND reserved <= balance),
    updated_at       timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 80);  -- room for HOT updates on a hot balance row

-- Transaction types and the direction each may move credits: +1 credit only, -1 debit only, 0 either.
CREATE TABLE public.ledger_transaction_types (
    name       text PRIMARY KEY,
    direction  smallint NOT NULL CHECK (direction IN (-1, 0, 1))
);
INSERT INTO public.ledger_transaction_types (name, direction) VALUES
    ('subscription_grant', 1),
    ('generation_deduction', -1),
    ('refund', 1),
    ('adjustment', 0),
    ('reconciliation_fix', 0);

CREATE TABLE public.points_transactions (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id           uuid NOT NULL,
    amount            bigint NOT NULL CHECK (amount <> 0),
    balance_after     bigint NOT NULL CHECK (balance_after >= 0),
    transaction_type  text NOT NULL REFERENCES public.ledger_transaction_types (name),
    description       text,
    idempotency_key   text NOT NULL UNIQUE,
    metadata          jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at        timestamptz NOT NULL DEFAULT now()
);
-- per-user ledger scans (history, the balance_after chain) in write order
CREATE INDEX points_transactions_user_idx ON public.points_transactions (user_id, id);
-- the audit's "grants of this period" and the hourly failure counts
CREATE INDEX points_transactions_type_created_idx ON public.points_transactions (transaction_type, created_at);

-- Deductions refused for insufficient credits. The refusal itself rolls back the caller's
-- transaction, so the attempt is recorded by a separate call (record_failed_deduction).
CREATE TABLE public.points_deduction_failures (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id          uuid NOT NULL,
    amount           bigint NOT NULL,
    balance          bigint,
    reason           text NOT NULL,
    idempotency_key  text,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX points_deduction_failures_created_idx ON public.points_deduction_failures (created_at);

-- Free-tier daily generations, counted server-side; one claim per job id.
CREATE TABLE public.free_generation_claims (
    job_id      text PRIMARY KEY,
    user_id     uuid NOT NULL,
    day         date NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX free_generation_claims_user_day_idx ON public.free_generation_claims (user_id, day);

-- Settings the SQL functions need (synced from the config file by `credits migrate`).
CREATE TABLE public.ledger_settings (
    name   text PRIMARY KEY,
    value  text NOT NULL
);
INSERT INTO public.ledger_settings (name, value) VALUES ('max_operation_amount', '1000000');

-- The ledger is append-only: corrections are new rows.
CREATE FUNCTION public.points_transactions_immutable() RETURNS trigger
LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
    RAISE EXCEPTION 'points_transactions is append-only: % refused (write a correcting row instead)', TG_OP
        USING ERRCODE = 'CR010';
END $$;
CREATE TRIGGER points_transactions_no_update_delete
    BEFORE UPDATE OR DELETE ON public.points_transactions
    FOR EACH ROW EXECUTE FUNCTION public.points_transactions_immutable();
CREATE TRIGGER points_transactions_no_truncate
    BEFORE TRUNCATE ON public.points_transactions
    FOR EACH STATEMENT EXECUTE FUNCTION public.points_transactions_immutable();
