-- Audit support (issue 3): the record of live audit runs and of every fix they applied, and the one
-- function a fix needs that must write points_balances (which only SECURITY DEFINER functions may).
--
-- A dry run writes nothing, not even here. A live run writes one audit_runs row; each applied fix
-- writes one audit_fix_log row in the same transaction as the change itself, so the log never claims
-- a fix that did not land, and a fix that landed is never missing from the log.

CREATE TABLE public.audit_runs (
    id            uuid PRIMARY KEY,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    actor         text NOT NULL,               -- who or what ran it: "cli:alice@host", "dagster:<run id>"
    live          boolean NOT NULL,
    rules         text[] NOT NULL,
    snapshot_at   timestamptz,                 -- the moment the audit's snapshot saw
    status        text CHECK (status IN ('HEALTHY', 'WARNING', 'CRITICAL')),  -- before the fixes
    planned       integer NOT NULL DEFAULT 0,
    applied       integer NOT NULL DEFAULT 0,
    skipped       integer NOT NULL DEFAULT 0,  -- nothing left to do (already fixed): idempotent replays
    failed        integer NOT NULL DEFAULT 0,
    counts        jsonb NOT NULL DEFAULT '{}'::jsonb  -- findings per rule
);

CREATE TABLE public.audit_fix_log (
    id                     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id                 uuid NOT NULL REFERENCES public.audit_runs (id),
    rule                   text NOT NULL,
    action                 text NOT NULL,
    bestauth_user_id       uuid,
    user_id                uuid,
    idempotency_key        text NOT NULL,
    before                 jsonb,
    after                  jsonb,
    ledger_transaction_id  bigint,             -- the ledger row the fix wrote, if it wrote one
    created_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_fix_log_run_idx ON public.audit_fix_log (run_id);
CREATE INDEX audit_fix_log_user_idx ON public.audit_fix_log (user_id);

-- The fix log is evidence: like the ledger, it is never rewritten.
CREATE TRIGGER audit_fix_log_no_update_delete
    BEFORE UPDATE OR DELETE ON public.audit_fix_log
    FOR EACH ROW EXECUTE FUNCTION public.points_transactions_immutable();

-- Rebuild one user's balance cache from the ledger (the ledger wins). Locks the balance row first, so
-- every ledger write of this user either committed before (and is summed) or waits for us: ledger
-- writers lock the same row before they insert their ledger row. Returns the row before and after;
-- applied = false when the cache already agreed (a replay changes nothing). Refuses (CR007) when the
-- ledger total would fall below the credits currently held by reservations: a person must decide.
CREATE FUNCTION public.audit_rebuild_balance(p_user_id uuid)
RETURNS TABLE (applied boolean, before jsonb, after jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_before public.points_balances%ROWTYPE;
    v_found boolean;
    v_sum bigint;
    v_earned bigint;
    v_spent bigint;
    v_count bigint;
BEGIN
    IF p_user_id IS NULL THEN
        RAISE EXCEPTION 'user id is required' USING ERRCODE = 'CR004';
    END IF;
    SELECT * INTO v_before FROM public.points_balances b WHERE b.user_id = p_user_id FOR UPDATE;
    v_found := FOUND;
    IF NOT v_found THEN
        -- a concurrent first grant could create the row; take it (or wait for it) before summing
        INSERT INTO public.points_balances (user_id) VALUES (p_user_id) ON CONFLICT (user_id) DO NOTHING;
        SELECT * INTO v_before FROM public.points_balances b WHERE b.user_id = p_user_id FOR UPDATE;
    END IF;
    SELECT coalesce(sum(t.amount), 0), coalesce(sum(t.amount) FILTER (WHERE t.amount > 0), 0),
           coalesce(-sum(t.amount) FILTER (WHERE t.amount < 0), 0), count(*)
      INTO v_sum, v_earned, v_spent, v_count
      FROM public.points_transactions t WHERE t.user_id = p_user_id;
    IF v_sum < 0 THEN
        RAISE EXCEPTION 'ledger of user % sums to %, below zero: a person must review it', p_user_id, v_sum
            USING ERRCODE = 'CR007';
    END IF;
    IF v_before.reserved > v_sum THEN
        RAISE EXCEPTION 'user % has % credits reserved but the ledger holds %: a person must decide',
            p_user_id, v_before.reserved, v_sum USING ERRCODE = 'CR007';
    END IF;
    before := CASE WHEN v_found THEN jsonb_build_object(
                  'balance', v_before.balance, 'lifetime_earned', v_before.lifetime_earned,
                  'lifetime_spent', v_before.lifetime_spent, 'reserved', v_before.reserved) END;
    after := jsonb_build_object('balance', v_sum, 'lifetime_earned', v_earned, 'lifetime_spent', v_spent,
                                'reserved', v_before.reserved, 'ledger_rows', v_count);
    IF v_found AND v_before.balance = v_sum AND v_before.lifetime_earned = v_earned
       AND v_before.lifetime_spent = v_spent THEN
        applied := false;
        RETURN NEXT;
        RETURN;
    END IF;
    UPDATE public.points_balances b
       SET balance = v_sum, lifetime_earned = v_earned, lifetime_spent = v_spent, updated_at = now()
     WHERE b.user_id = p_user_id;
    applied := true;
    RETURN NEXT;
END $$;

REVOKE EXECUTE ON FUNCTION public.audit_rebuild_balance(uuid) FROM PUBLIC;
REVOKE UPDATE, DELETE, TRUNCATE ON public.audit_fix_log FROM PUBLIC;
