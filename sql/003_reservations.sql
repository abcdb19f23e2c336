-- Reservations (issue 5): two-phase charges for long generations, and holds that expire.
--
-- A hold moves nothing in the ledger: it raises points_balances.reserved, so spendable credits
-- (balance - reserved) fall and two jobs started at once cannot together overspend. Capturing a hold
-- frees it and charges at most the held amount through deduct_points (the one deduction path, with its
-- idempotency key 'capture:<job id>'); releasing or expiring a hold frees it and charges nothing.
--
-- Invariant kept by every function here (and checked by the tests and the view reserved_mismatches):
--   points_balances.reserved = sum(amount) of the user's reservations with status 'active'.
--
-- SQLSTATEs: CR001 not enough spendable credits (as for a deduction), CR002 job id reused with another
-- user or amount, CR003 bad amount, CR004 bad argument, CR005 the hold cannot be captured or released
-- (unknown job, already released, expired, already captured with another amount).
--
-- Lock order: a reservation row before its user's balance row (capture, release, expiry); reserve takes
-- only the balance row (its reservation row is new). Expiry skips reservation rows another session holds
-- (SKIP LOCKED: they are being settled) and takes balance rows in user id order.
--
-- For later migrations: 003 replaces ledger_apply (the lazy expiry on a short deduction); a later
-- CREATE OR REPLACE of ledger_apply must keep that block. capture_reservation charges through
-- public.deduct_points, so whatever a later migration makes a deduction do applies to captures too.

CREATE TABLE public.points_reservations (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id           text NOT NULL UNIQUE CHECK (length(job_id) BETWEEN 1 AND 480),
    user_id          uuid NOT NULL,
    amount           bigint NOT NULL CHECK (amount > 0),
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'captured', 'released', 'expired')),
    captured_amount  bigint CHECK (captured_amount > 0 AND captured_amount <= amount),
    -- the capture's ledger row (no FOREIGN KEY: it would make TRUNCATE of the ledger fail with 0A000
    -- before the append-only trigger could refuse it with CR010)
    transaction_id   bigint,
    metadata         jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    settled_at       timestamptz,
    CHECK ((status = 'captured') = (captured_amount IS NOT NULL AND transaction_id IS NOT NULL)),
    CHECK ((status = 'active') = (settled_at IS NULL))
);
-- a user's active holds (lazy expiry, the audit) and the expiry sweep
CREATE INDEX points_reservations_active_user_idx ON public.points_reservations (user_id) WHERE status = 'active';
CREATE INDEX points_reservations_active_expiry_idx ON public.points_reservations (expires_at) WHERE status = 'active';

INSERT INTO public.ledger_settings (name, value) VALUES ('reservation_ttl_seconds', '3600')
ON CONFLICT (name) DO NOTHING;

-- A settled hold is evidence of what was charged: it never changes again, and no hold is deleted.
-- An active hold may only move to a settled state (or have its expiry moved); job, user and amount are fixed.
CREATE FUNCTION public.points_reservations_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'points_reservations rows are never deleted (job %)', OLD.job_id USING ERRCODE = 'CR010';
    END IF;
    IF OLD.status <> 'active' THEN
        RAISE EXCEPTION 'reservation for job % is % and cannot change', OLD.job_id, OLD.status USING ERRCODE = 'CR010';
    END IF;
    IF NEW.job_id <> OLD.job_id OR NEW.user_id <> OLD.user_id OR NEW.amount <> OLD.amount
       OR NEW.created_at <> OLD.created_at THEN
        RAISE EXCEPTION 'reservation for job %: job, user, amount and creation time are fixed', OLD.job_id
            USING ERRCODE = 'CR010';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER points_reservations_guard
    BEFORE UPDATE OR DELETE ON public.points_reservations
    FOR EACH ROW EXECUTE FUNCTION public.points_reservations_guard();
CREATE TRIGGER points_reservations_no_truncate
    BEFORE TRUNCATE ON public.points_reservations
    FOR EACH STATEMENT EXECUTE FUNCTION public.points_transactions_immutable();

-- Free every expired hold (of one user, or of everyone: the daily pipeline). Returns how many holds and
-- credits were freed. Holds locked by another session are skipped: that session is settling them.
CREATE FUNCTION public.release_expired_reservations(p_user_id uuid DEFAULT NULL)
RETURNS TABLE (released integer, credits bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    rec record;
BEGIN
    released := 0;
    credits := 0;
    FOR rec IN
        WITH expired AS (
            SELECT r.id FROM public.points_reservations r
             WHERE r.status = 'active' AND r.expires_at <= now()
               AND (p_user_id IS NULL OR r.user_id = p_user_id)
             FOR UPDATE SKIP LOCKED
        ), marked AS (
            UPDATE public.points_reservations r SET status = 'expired', settled_at = now()
              FROM expired e WHERE r.id = e.id
            RETURNING r.user_id, r.amount
        )
        SELECT m.user_id, sum(m.amount)::bigint AS held, count(*)::integer AS n
          FROM marked m GROUP BY m.user_id ORDER BY m.user_id
    LOOP
        UPDATE public.points_balances b SET reserved = b.reserved - rec.held, updated_at = now()
         WHERE b.user_id = rec.user_id;
        released := released + rec.n;
        credits := credits + rec.held;
    END LOOP;
    RETURN NEXT;
END $$;

-- The answer to a retried reservation: the first hold, or CR002 when the job id names another hold.
CREATE FUNCTION public.reservation_replay(p_job_id text, p_user_id uuid, p_amount bigint)
RETURNS TABLE (reservation_id bigint, spendable_after bigint, duplicate boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    r record;
BEGIN
    SELECT x.id, x.user_id, x.amount INTO r FROM public.points_reservations x WHERE x.job_id = p_job_id;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF r.user_id <> p_user_id OR r.amount <> p_amount THEN
        RAISE EXCEPTION 'job id % already holds a reservation for another user or amount', p_job_id
            USING ERRCODE = 'CR002',
                  DETAIL = format('first hold: user %s, amount %s; this call: user %s, amount %s',
                                  r.user_id, r.amount, p_user_id, p_amount);
    END IF;
    RETURN QUERY SELECT r.id, coalesce((SELECT b.balance - b.reserved FROM public.points_balances b
                                         WHERE b.user_id = p_user_id), 0::bigint), true;
END $$;

CREATE FUNCTION public.reserve_points(p_user_id uuid, p_amount bigint, p_job_id text,
                                      p_ttl_seconds integer DEFAULT NULL, p_metadata jsonb DEFAULT '{}'::jsonb)
RETURNS TABLE (reservation_id bigint, spendable_after bigint, duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_ttl integer;
    v_max bigint;
    v_spendable bigint;
    v_have bigint;
    v_id bigint;
BEGIN
    IF p_user_id IS NULL THEN
        RAISE EXCEPTION 'user id is required' USING ERRCODE = 'CR004';
    END IF;
    IF p_job_id IS NULL OR length(p_job_id) NOT BETWEEN 1 AND 480 THEN
        RAISE EXCEPTION 'job id must be 1 to 480 characters' USING ERRCODE = 'CR004';
    END IF;
    IF p_amount IS NULL OR p_amount <= 0 THEN
        RAISE EXCEPTION 'amount must be a positive whole number of credits, got %', coalesce(p_amount::text, 'NULL')
            USING ERRCODE = 'CR003';
    END IF;
    SELECT s.value::bigint INTO v_max FROM public.ledger_settings s WHERE s.name = 'max_operation_amount';
    IF p_amount > v_max THEN
        RAISE EXCEPTION 'amount % exceeds the per-operation maximum of %', p_amount, v_max USING ERRCODE = 'CR003';
    END IF;
    IF p_ttl_seconds IS NOT NULL AND (p_ttl_seconds <= 0 OR p_ttl_seconds > 7 * 86400) THEN
        RAISE EXCEPTION 'ttl must be 1 to 604800 seconds, got %', p_ttl_seconds USING ERRCODE = 'CR004';
    END IF;
    v_ttl := coalesce(p_ttl_seconds,
                      (SELECT s.value::integer FROM public.ledger_settings s WHERE s.name = 'reservation_ttl_seconds'),
                      3600);

    -- a retried call: the first hold, lock nothing
    RETURN QUERY SELECT * FROM public.reservation_replay(p_job_id, p_user_id, p_amount);
    IF FOUND THEN RETURN; END IF;

    UPDATE public.points_balances b SET reserved = b.reserved + p_amount, updated_at = now()
     WHERE b.user_id = p_user_id AND b.balance - b.reserved >= p_amount
    RETURNING b.balance - b.reserved INTO v_spendable;
    IF v_spendable IS NULL THEN
        -- a concurrent call for this job may have won while we waited for the row lock
        RETURN QUERY SELECT * FROM public.reservation_replay(p_job_id, p_user_id, p_amount);
        IF FOUND THEN RETURN; END IF;
        -- expired holds still counted against the user: free them and try once more
        IF EXISTS (SELECT 1 FROM public.points_reservations r
                    WHERE r.user_id = p_user_id AND r.status = 'active' AND r.expires_at <= now()) THEN
            PERFORM public.release_expired_reservations(p_user_id);
            UPDATE public.points_balances b SET reserved = b.reserved + p_amount, updated_at = now()
             WHERE b.user_id = p_user_id AND b.balance - b.reserved >= p_amount
            RETURNING b.balance - b.reserved INTO v_spendable;
        END IF;
    END IF;
    IF v_spendable IS NULL THEN
        SELECT b.balance - b.reserved INTO v_have FROM public.points_balances b WHERE b.user_id = p_user_id;
        RAISE EXCEPTION 'insufficient credits: user % has % spendable, needs %', p_user_id, coalesce(v_have, 0), p_amount
            USING ERRCODE = 'CR001',
                  DETAIL = json_build_object('user_id', p_user_id, 'spendable', coalesce(v_have, 0),
                                             'requested', p_amount)::text;
    END IF;

    INSERT INTO public.points_reservations AS r (job_id, user_id, amount, metadata, expires_at)
    VALUES (p_job_id, p_user_id, p_amount, coalesce(p_metadata, '{}'::jsonb), now() + make_interval(secs => v_ttl))
    ON CONFLICT (job_id) DO NOTHING
    RETURNING r.id INTO v_id;
    IF v_id IS NULL THEN
        -- lost the race for this job id: undo our hold (the balance row is still ours) and answer as a retry
        UPDATE public.points_balances b SET reserved = b.reserved - p_amount WHERE b.user_id = p_user_id;
        RETURN QUERY SELECT * FROM public.reservation_replay(p_job_id, p_user_id, p_amount);
        RETURN;
    END IF;
    RETURN QUERY SELECT v_id, v_spendable, false;
END $$;

-- Charge a hold: at most the held amount (default all of it), written as a generation_deduction through
-- deduct_points under the key 'capture:<job id>'; the rest of the hold is freed. A repeated capture of the
-- same amount answers with the first ledger row (duplicate = true).
CREATE FUNCTION public.capture_reservation(p_job_id text, p_amount bigint DEFAULT NULL)
RETURNS TABLE (new_balance bigint, transaction_id bigint, duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    r public.points_reservations%ROWTYPE;
    v_amount bigint;
    w record;
BEGIN
    IF p_job_id IS NULL OR length(p_job_id) NOT BETWEEN 1 AND 480 THEN
        RAISE EXCEPTION 'job id must be 1 to 480 characters' USING ERRCODE = 'CR004';
    END IF;
    SELECT * INTO r FROM public.points_reservations x WHERE x.job_id = p_job_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no reservation for job %', p_job_id USING ERRCODE = 'CR005';
    END IF;
    v_amount := coalesce(p_amount, r.amount);
    IF r.status = 'captured' THEN
        IF v_amount = r.captured_amount THEN
            RETURN QUERY SELECT t.balance_after, t.id, true FROM public.points_transactions t WHERE t.id = r.transaction_id;
            RETURN;
        END IF;
        RAISE EXCEPTION 'reservation for job % was already captured for % credits; a capture of % is refused',
            p_job_id, r.captured_amount, v_amount USING ERRCODE = 'CR005';
    END IF;
    IF r.status = 'released' THEN
        RAISE EXCEPTION 'reservation for job % was released; nothing to capture', p_job_id USING ERRCODE = 'CR005';
    END IF;
    IF r.status = 'expired' OR r.expires_at <= now() THEN
        RAISE EXCEPTION 'reservation for job % expired at %; nothing to capture', p_job_id, r.expires_at
            USING ERRCODE = 'CR005';
    END IF;
    IF v_amount <= 0 OR v_amount > r.amount THEN
        RAISE EXCEPTION 'capture amount must be 1 to the % credits held for job %, got %', r.amount, p_job_id, v_amount
            USING ERRCODE = 'CR003';
    END IF;

    UPDATE public.points_balances b SET reserved = b.reserved - r.amount WHERE b.user_id = r.user_id;
    SELECT * INTO w FROM public.deduct_points(
        r.user_id, v_amount, 'generation_deduction', 'reserved generation, job ' || left(p_job_id, 200),
        'capture:' || p_job_id,
        r.metadata || jsonb_build_object('job_id', p_job_id, 'reservation_id', r.id, 'reserved', r.amount));
    UPDATE public.points_reservations x
       SET status = 'captured', captured_amount = v_amount, transaction_id = w.transaction_id, settled_at = now()
     WHERE x.id = r.id;
    RETURN QUERY SELECT w.new_balance, w.transaction_id, w.duplicate;
END $$;

-- Free a hold without charging (the job failed or was cancelled). false when it was already captured,
-- released or expired; CR005 for a job id that never held anything.
CREATE FUNCTION public.release_reservation(p_job_id text, OUT released boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    r public.points_reservations%ROWTYPE;
BEGIN
    IF p_job_id IS NULL OR length(p_job_id) NOT BETWEEN 1 AND 480 THEN
        RAISE EXCEPTION 'job id must be 1 to 480 characters' USING ERRCODE = 'CR004';
    END IF;
    SELECT * INTO r FROM public.points_reservations x WHERE x.job_id = p_job_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no reservation for job %', p_job_id USING ERRCODE = 'CR005';
    END IF;
    IF r.status <> 'active' THEN
        released := false;
        RETURN;
    END IF;
    UPDATE public.points_balances b SET reserved = b.reserved - r.amount, updated_at = now() WHERE b.user_id = r.user_id;
    UPDATE public.points_reservations x SET status = 'released', settled_at = now() WHERE x.id = r.id;
    released := true;
END $$;

-- 002's ledger_apply, unchanged except for one block: a deduction short of spendable credits frees the
-- user's expired holds (if any) and tries once more before refusing. The common case pays nothing for it.
CREATE OR REPLACE FUNCTION public.ledger_apply(p_user_id uuid, p_delta bigint, p_transaction_type text,
                                               p_description text, p_idempotency_key text, p_metadata jsonb)
RETURNS TABLE (new_balance bigint, transaction_id bigint, duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_key text := coalesce(p_idempotency_key, 'auto:' || gen_random_uuid()::text);
    v_abs bigint := abs(p_delta);
    v_new bigint;
    v_have bigint;
    v_id bigint;
BEGIN
    -- a retried call: answer with the first result, lock nothing
    IF p_idempotency_key IS NOT NULL THEN
        RETURN QUERY SELECT * FROM public.ledger_replay(v_key, p_user_id, p_delta, p_transaction_type);
        IF FOUND THEN RETURN; END IF;
    END IF;

    IF p_delta > 0 THEN
        INSERT INTO public.points_balances AS b (user_id, balance, lifetime_earned, updated_at)
        VALUES (p_user_id, p_delta, p_delta, now())
        ON CONFLICT (user_id) DO UPDATE
            SET balance = b.balance + excluded.balance,
                lifetime_earned = b.lifetime_earned + excluded.lifetime_earned,
                updated_at = excluded.updated_at
        RETURNING b.balance INTO v_new;
    ELSE
        UPDATE public.points_balances b
           SET balance = b.balance - v_abs, lifetime_spent = b.lifetime_spent + v_abs, updated_at = now()
         WHERE b.user_id = p_user_id AND b.balance - b.reserved >= v_abs
        RETURNING b.balance INTO v_new;
        IF v_new IS NULL THEN
            -- a concurrent caller may have used this key while we waited for the row lock
            IF p_idempotency_key IS NOT NULL THEN
                RETURN QUERY SELECT * FROM public.ledger_replay(v_key, p_user_id, p_delta, p_transaction_type);
                IF FOUND THEN RETURN; END IF;
            END IF;
            -- 003: expired holds still counted against the user: free them and try once more
            IF EXISTS (SELECT 1 FROM public.points_reservations r
                        WHERE r.user_id = p_user_id AND r.status = 'active' AND r.expires_at <= now()) THEN
                PERFORM public.release_expired_reservations(p_user_id);
                UPDATE public.points_balances b
                   SET balance = b.balance - v_abs, lifetime_spent = b.lifetime_spent + v_abs, updated_at = now()
                 WHERE b.user_id = p_user_id AND b.balance - b.reserved >= v_abs
                RETURNING b.balance INTO v_new;
            END IF;
        END IF;
        IF v_new IS NULL THEN
            SELECT b.balance - b.reserved INTO v_have FROM public.points_balances b WHERE b.user_id = p_user_id;
            RAISE EXCEPTION 'insufficient credits: user % has % spendable, needs %', p_user_id, coalesce(v_have, 0), v_abs
                USING ERRCODE = 'CR001',
                      DETAIL = json_build_object('user_id', p_user_id, 'spendable', coalesce(v_have, 0),
                                                 'requested', v_abs)::text;
        END IF;
    END IF;

    INSERT INTO public.points_transactions AS t
        (user_id, amount, balance_after, transaction_type, description, idempotency_key, metadata)
    VALUES (p_user_id, p_delta, v_new, p_transaction_type, p_description, v_key, coalesce(p_metadata, '{}'::jsonb))
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING t.id INTO v_id;

    IF v_id IS NULL THEN
        -- lost the race for this key to a concurrent caller: undo our change (the row is still ours)
        UPDATE public.points_balances b
           SET balance = b.balance - p_delta,
               lifetime_earned = b.lifetime_earned - greatest(p_delta, 0),
               lifetime_spent = b.lifetime_spent - greatest(-p_delta, 0)
         WHERE b.user_id = p_user_id;
        RETURN QUERY SELECT * FROM public.ledger_replay(v_key, p_user_id, p_delta, p_transaction_type);
        RETURN;
    END IF;

    RETURN QUERY SELECT v_new, v_id, false;
END $$;

-- For the audit's stale_reservations rule and the daily pipeline: holds past their expiry, not yet freed.
CREATE VIEW public.stale_reservations AS
SELECT r.id AS reservation_id, r.job_id, r.user_id, r.amount, r.created_at, r.expires_at,
       now() - r.expires_at AS overdue
  FROM public.points_reservations r
 WHERE r.status = 'active' AND r.expires_at <= now();

-- Users whose cached reserved credits differ from their active holds (must stay empty).
CREATE VIEW public.reserved_mismatches AS
SELECT coalesce(b.user_id, h.user_id) AS user_id, coalesce(b.reserved, 0) AS reserved,
       coalesce(h.held, 0) AS active_holds
  FROM public.points_balances b
  FULL JOIN (SELECT r.user_id, sum(r.amount)::bigint AS held FROM public.points_reservations r
              WHERE r.status = 'active' GROUP BY r.user_id) h ON h.user_id = b.user_id
 WHERE coalesce(b.reserved, 0) <> coalesce(h.held, 0);

REVOKE EXECUTE ON FUNCTION
    public.release_expired_reservations(uuid),
    public.reservation_replay(text, uuid, bigint),
    public.reserve_points(uuid, bigint, text, integer, jsonb),
    public.capture_reservation(text, bigint),
    public.release_reservation(text),
    public.ledger_apply(uuid, bigint, text, text, text, jsonb)
FROM PUBLIC;
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON public.points_reservations FROM PUBLIC;
