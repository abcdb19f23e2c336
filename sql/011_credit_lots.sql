-- Credit lifecycle, part 2 (issue 6): grants as lots, consumption order, expiry and rollover, refunds.
--
-- Every positive ledger row is a lot (points_lots, id = the ledger row's id) with a priority and an
-- optional expiry, taken from the row's metadata.lot ({"expires_at", "priority", "rollover_cap",
-- "rollover_until"}; add_points' p_expires_at / p_priority fill it in). Every negative ledger row draws
-- on lots, recorded in points_lot_consumptions (which lot, how much), so a user can see where each credit
-- went (the view points_lot_draws; a single-lot deduction carries its lot in points_transactions.lot_id):
--   - a deduction or a capture draws by priority (lower first), then soonest expiry (none last), then
--     oldest;
--   - an `expiry` row draws on the lot named by its metadata.lot_id;
--   - a `refund` row with metadata.refund_of returns credits to the lots that deduction drew on
--     (a negative consumption; the lot keeps its expiry).
-- One AFTER INSERT trigger on the ledger does this for every write path (functions, fixes, seeds), so
-- the lots are a cache of the ledger like points_balances is: for every user,
--   balance = sum(ledger) = sum(remaining of lots), and per lot granted - remaining = what drew on it.
--
-- Expiry is a ledger row of type `expiry` (key 'expiry:<lot>:<credits expired from it so far>'), written
-- by expire_lots(user) -- lazily, before any deduction, reservation or balance read of a user whose
-- earliest open expiry has passed (points_balances.next_expiry), and by the daily sweep
-- expire_due_lots(). Credits held by an active reservation do not expire under it (reserved <= balance
-- must hold); they stay in their lot until the hold is captured or released, and expire then.
-- Rollover: a lot with rollover_cap keeps up to that many credits (over all of the user's lots with the
-- same period end) by moving their expiry to rollover_until, once; the rest expires.
--
-- Lots written before this migration are backfilled oldest-first from the ledger (their past draws are
-- not itemised: consumed_before holds them).

CREATE TABLE public.points_lots (
    id               bigint PRIMARY KEY,                 -- the granting ledger row (points_transactions.id)
    user_id          uuid NOT NULL,
    source_type      text NOT NULL,                      -- the granting row's transaction_type
    granted          bigint NOT NULL CHECK (granted > 0),
    remaining        bigint NOT NULL CHECK (remaining >= 0),
    expired          bigint NOT NULL DEFAULT 0 CHECK (expired >= 0),
    consumed_before  bigint NOT NULL DEFAULT 0 CHECK (consumed_before >= 0),  -- backfill: draws before 011
    priority         integer NOT NULL DEFAULT 50,
    expires_at       timestamptz,                        -- NULL: never expires
    period_end       timestamptz,                        -- the expiry it was granted with, once rolled over
    rollover_cap     bigint CHECK (rollover_cap >= 0),
    rollover_until   timestamptz,
    rolled_over      bigint,                             -- credits kept past period_end by the rollover
    created_at       timestamptz NOT NULL
) WITH (fillfactor = 80);  -- remaining is not indexed: draws are HOT updates
-- a user's lots in consumption order
CREATE INDEX points_lots_user_order_idx ON public.points_lots (user_id, priority, expires_at, id);

CREATE TABLE public.points_lot_consumptions (
    transaction_id  bigint NOT NULL,    -- the ledger row that drew (or, for a refund, returned)
    lot_id          bigint,             -- NULL: no open lot covered the draw (lots_consistent reports it)
    user_id         uuid NOT NULL,
    amount          bigint NOT NULL CHECK (amount <> 0),  -- > 0 drawn from the lot, < 0 returned to it
    created_at      timestamptz NOT NULL
);
CREATE INDEX points_lot_consumptions_tx_idx ON public.points_lot_consumptions (transaction_id);
CREATE INDEX points_lot_consumptions_lot_idx ON public.points_lot_consumptions (lot_id);

-- The common draw -- one lot covers the whole deduction -- is recorded on the ledger row itself
-- (points_transactions.lot_id, set by deduct_points' fast path), which saves a row per deduction;
-- every other draw (several lots, expiry, refunds) is in points_lot_consumptions. points_lot_draws is
-- both: read draws from it.
ALTER TABLE public.points_transactions ADD COLUMN lot_id bigint;

CREATE VIEW public.points_lot_draws AS
SELECT c.transaction_id, c.lot_id, c.user_id, c.amount, c.created_at FROM public.points_lot_consumptions c
UNION ALL
SELECT t.id, t.lot_id, t.user_id, -t.amount, t.created_at FROM public.points_transactions t
 WHERE t.lot_id IS NOT NULL;

CREATE TRIGGER points_lot_consumptions_no_update_delete
    BEFORE UPDATE OR DELETE ON public.points_lot_consumptions
    FOR EACH ROW EXECUTE FUNCTION public.points_transactions_immutable();

-- The earliest expiry among the user's open lots (or earlier: an early value only sends the next call
-- through expire_lots, which sets it exactly). Deductions take their fast path only while it is NULL or
-- in the future.
ALTER TABLE public.points_balances ADD COLUMN next_expiry timestamptz;
CREATE INDEX points_balances_next_expiry_idx ON public.points_balances (next_expiry) WHERE next_expiry IS NOT NULL;

INSERT INTO public.ledger_transaction_types (name, direction) VALUES
    ('top_up', 1), ('plan_change', 1), ('expiry', -1)
ON CONFLICT (name) DO NOTHING;
INSERT INTO public.ledger_settings (name, value) VALUES ('grant_priority', '50') ON CONFLICT (name) DO NOTHING;

-- ------------------------------------------------------------------------------------------- the trigger

-- How the trigger draws, and why (measured with benchmarks/lots_throughput.py and the 1M-user bench):
-- - several lots: walk the user's open lots in consumption order (the index's order) and stop once the draw
--   is covered -- a first version ranked all open lots with a window sum before every such draw, 0.48x the
--   single-lot throughput with 50 open lots against 0.69x for the walk;
-- - a refund: the ids of the deduction and of any earlier refund of it are collected first and matched
--   with = ANY, which both halves of points_lot_draws answer by index (an OR there made every refund scan
--   the whole ledger); it returns at most what each lot gave net of earlier refunds, and credits beyond
--   that become a lot of only the rest (both only reachable by refund rows written around
--   refund_generation, whose once-only rule is the normal path).
CREATE FUNCTION public.points_lots_follow_ledger() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_terms jsonb := NEW.metadata -> 'lot';
    v_expires timestamptz;
    v_refund_of bigint;
    v_txs bigint[];
    v_lot bigint;
    v_left bigint;
    v_taken bigint;
    v_ids bigint[] := '{}';
    v_ns bigint[] := '{}';
    d record;
BEGIN
    IF NEW.amount > 0 THEN
        IF NEW.transaction_type = 'refund' AND jsonb_typeof(NEW.metadata -> 'refund_of') = 'number' THEN
            v_refund_of := (NEW.metadata ->> 'refund_of')::bigint;
            v_left := NEW.amount;
            -- back to the lots the deduction drew on, the last drawn first, never more than each gave
            -- net of what earlier refunds of the same deduction already returned (refund_generation
            -- allows one; a refund row written through add_points may be a second)
            v_txs := v_refund_of || ARRAY(SELECT r.id FROM public.points_transactions r
                                           WHERE r.user_id = NEW.user_id AND r.id <> NEW.id
                                             AND r.transaction_type = 'refund'
                                             AND r.metadata -> 'refund_of' = NEW.metadata -> 'refund_of');
            FOR d IN SELECT c.lot_id, sum(c.amount)::bigint AS net
                       FROM public.points_lot_draws c
                      WHERE c.transaction_id = ANY (v_txs) AND c.lot_id IS NOT NULL
                      GROUP BY c.lot_id HAVING sum(c.amount) > 0
                      ORDER BY c.lot_id DESC LOOP
                EXIT WHEN v_left = 0;
                v_taken := least(d.net, v_left);
                UPDATE public.points_lots l SET remaining = l.remaining + v_taken WHERE l.id = d.lot_id;
                INSERT INTO public.points_lot_consumptions (transaction_id, lot_id, user_id, amount, created_at)
                VALUES (NEW.id, d.lot_id, NEW.user_id, -v_taken, NEW.created_at);
                v_left := v_left - v_taken;
                SELECT l.expires_at INTO v_expires FROM public.points_lots l WHERE l.id = d.lot_id;
                IF v_expires IS NOT NULL THEN
                    UPDATE public.points_balances b SET next_expiry = least(b.next_expiry, v_expires)
                     WHERE b.user_id = NEW.user_id AND (b.next_expiry IS NULL OR b.next_expiry > v_expires);
                END IF;
            END LOOP;
            IF v_left = 0 THEN
                RETURN NULL;
            END IF;
            -- more than the deduction drew (refunds_bounded reports it): the rest is a lot of its own
            v_terms := NULL;
        END IF;
        v_left := coalesce(v_left, NEW.amount);  -- what the new lot holds: all of a grant, a refund's rest
        v_expires := CASE WHEN jsonb_typeof(v_terms -> 'expires_at') = 'string'
                          THEN (v_terms ->> 'expires_at')::timestamptz END;
        INSERT INTO public.points_lots (id, user_id, source_type, granted, remaining, priority, expires_at,
                                        rollover_cap, rollover_until, created_at)
        VALUES (NEW.id, NEW.user_id, NEW.transaction_type, v_left, v_left,
                coalesce(CASE WHEN jsonb_typeof(v_terms -> 'priority') = 'number'
                              THEN (v_terms ->> 'priority')::integer END,
                         (SELECT s.value::integer FROM public.ledger_settings s WHERE s.name = 'grant_priority'), 50),
                v_expires,
                CASE WHEN v_expires IS NOT NULL AND jsonb_typeof(v_terms -> 'rollover_cap') = 'number'
                     THEN (v_terms ->> 'rollover_cap')::bigint END,
                CASE WHEN v_expires IS NOT NULL AND jsonb_typeof(v_terms -> 'rollover_until') = 'string'
                     THEN (v_terms ->> 'rollover_until')::timestamptz END,
                NEW.created_at);
        IF v_expires IS NOT NULL THEN
            UPDATE public.points_balances b SET next_expiry = v_expires
             WHERE b.user_id = NEW.user_id AND (b.next_expiry IS NULL OR b.next_expiry > v_expires);
        END IF;
        RETURN NULL;
    END IF;

    -- a draw
    v_left := -NEW.amount;
    IF NEW.transaction_type = 'expiry' AND jsonb_typeof(NEW.metadata -> 'lot_id') = 'number' THEN
        v_lot := (NEW.metadata ->> 'lot_id')::bigint;
        UPDATE public.points_lots l SET remaining = l.remaining - v_left, expired = l.expired + v_left
         WHERE l.id = v_lot AND l.user_id = NEW.user_id AND l.remaining >= v_left;
        IF FOUND THEN
            INSERT INTO public.points_lot_consumptions (transaction_id, lot_id, user_id, amount, created_at)
            VALUES (NEW.id, v_lot, NEW.user_id, v_left, NEW.created_at);
            RETURN NULL;
        END IF;
    END IF;
    -- priority, then soonest expiry (none last), then oldest; walk the user's open lots in that order
    -- (the index's order) and stop once the draw is covered: a user with 50 open lots pays for the two
    -- or three a draw touches, not for ranking all 50
    v_taken := 0;
    FOR d IN SELECT l.id, l.remaining FROM public.points_lots l
              WHERE l.user_id = NEW.user_id AND l.remaining > 0
              ORDER BY l.priority, l.expires_at, l.id LOOP
        v_lot := least(d.remaining, v_left - v_taken);
        UPDATE public.points_lots l SET remaining = l.remaining - v_lot WHERE l.id = d.id;
        v_ids := v_ids || d.id;
        v_ns := v_ns || v_lot;
        v_taken := v_taken + v_lot;
        EXIT WHEN v_taken = v_left;
    END LOOP;
    INSERT INTO public.points_lot_consumptions (transaction_id, lot_id, user_id, amount, created_at)
    SELECT NEW.id, x.lot_id, NEW.user_id, x.n, NEW.created_at FROM unnest(v_ids, v_ns) AS x (lot_id, n);
    IF v_taken < v_left THEN
        -- no open lot covers the rest: the lots disagree with the balance; lots_consistent reports it
        INSERT INTO public.points_lot_consumptions (transaction_id, lot_id, user_id, amount, created_at)
        VALUES (NEW.id, NULL, NEW.user_id, v_left - v_taken, NEW.created_at);
    END IF;
    RETURN NULL;
END $$;

-- ---------------------------------------------------------------------------------- backfill (pre-011)

INSERT INTO public.points_lots (id, user_id, source_type, granted, remaining, consumed_before, priority,
                                created_at)
SELECT g.id, g.user_id, g.transaction_type, g.amount, g.remaining, g.amount - g.remaining, 50, g.created_at
  FROM (
    SELECT t.id, t.user_id, t.transaction_type, t.amount, t.created_at,
           least(t.amount, greatest(0, sum(t.amount) OVER w - s.spent))::bigint AS remaining
      FROM public.points_transactions t
      JOIN (SELECT user_id, coalesce(-sum(amount) FILTER (WHERE amount < 0), 0) AS spent
              FROM public.points_transactions GROUP BY user_id) s ON s.user_id = t.user_id
     WHERE t.amount > 0
    WINDOW w AS (PARTITION BY t.user_id ORDER BY t.id)
  ) g;

-- rows that carry their draw (lot_id) were drawn by their writer; the trigger does all the others
CREATE TRIGGER points_transactions_lots
    AFTER INSERT ON public.points_transactions
    FOR EACH ROW WHEN (NEW.lot_id IS NULL) EXECUTE FUNCTION public.points_lots_follow_ledger();

-- ------------------------------------------------------------------------------------------------ expiry

-- Write off a user's expired credits now (rolling over what the lot's policy keeps). Idempotent: run it
-- twice and the second run writes nothing. Takes the user's balance row lock, like every ledger write.
CREATE FUNCTION public.expire_lots(p_user_id uuid)
RETURNS TABLE (lots integer, credits bigint, rolled_over bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_balance bigint;
    v_reserved bigint;
    v_found boolean;
    l record;
    v_roll bigint;
    v_want bigint;
    v_exp bigint;
BEGIN
    lots := 0; credits := 0; rolled_over := 0;
    IF p_user_id IS NULL THEN
        RAISE EXCEPTION 'user id is required' USING ERRCODE = 'CR004';
    END IF;
    SELECT b.balance, b.reserved INTO v_balance, v_reserved FROM public.points_balances b
     WHERE b.user_id = p_user_id FOR UPDATE;
    v_found := FOUND;
    IF NOT v_found THEN
        RETURN NEXT;
        RETURN;
    END IF;
    FOR l IN SELECT * FROM public.points_lots x
              WHERE x.user_id = p_user_id AND x.remaining > 0 AND x.expires_at <= now()
              ORDER BY x.expires_at, x.id LOOP
        v_roll := 0;
        IF l.rollover_cap IS NOT NULL AND l.rollover_until > l.expires_at AND l.period_end IS NULL THEN
            v_roll := least(l.remaining, greatest(0, l.rollover_cap - coalesce(
                (SELECT sum(x.rolled_over) FROM public.points_lots x
                  WHERE x.user_id = p_user_id AND x.period_end = l.expires_at), 0)));
        END IF;
        v_want := l.remaining - v_roll;
        v_exp := least(v_want, v_balance - v_reserved);  -- held credits do not expire under the hold
        IF v_exp < v_want THEN
            v_roll := 0;  -- decide the rollover once the hold is settled and the whole lot can be judged
            v_exp := least(l.remaining, v_balance - v_reserved);
        END IF;
        IF v_roll > 0 THEN
            UPDATE public.points_lots x
               SET period_end = x.expires_at, expires_at = x.rollover_until, rolled_over = v_roll
             WHERE x.id = l.id;
            rolled_over := rolled_over + v_roll;
        END IF;
        IF v_exp > 0 THEN
            v_balance := v_balance - v_exp;
            UPDATE public.points_balances b
               SET balance = v_balance, lifetime_spent = b.lifetime_spent + v_exp, updated_at = now()
             WHERE b.user_id = p_user_id;
            INSERT INTO public.points_transactions
                (user_id, amount, balance_after, transaction_type, description, idempotency_key, metadata)
            VALUES (p_user_id, -v_exp, v_balance, 'expiry',
                    format('%s unspent credits of lot %s expired at %s', v_exp, l.id, l.expires_at),
                    format('expiry:%s:%s', l.id, l.expired + v_exp),
                    jsonb_build_object('lot_id', l.id, 'expires_at', l.expires_at, 'source_type', l.source_type,
                                       'rolled_over', v_roll));
            credits := credits + v_exp;
        END IF;
        IF v_exp > 0 OR v_roll > 0 THEN
            lots := lots + 1;
        END IF;
    END LOOP;
    UPDATE public.points_balances b
       SET next_expiry = (SELECT min(x.expires_at) FROM public.points_lots x
                           WHERE x.user_id = p_user_id AND x.remaining > 0 AND x.expires_at IS NOT NULL)
     WHERE b.user_id = p_user_id;
    RETURN NEXT;
END $$;

-- The lazy path: expire only when something is due (a cheap look at the balance row otherwise).
-- Skipped inside capture_reservation's own deduction (credits.capturing): the hold it charges protected
-- those credits from expiry, and capture already ran expire_lots while the hold was in place.
CREATE FUNCTION public.expire_lots_if_due(p_user_id uuid) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    IF coalesce(current_setting('credits.capturing', true), '') <> 'on'
       AND EXISTS (SELECT 1 FROM public.points_balances b WHERE b.user_id = p_user_id AND b.next_expiry <= now()) THEN
        PERFORM public.expire_lots(p_user_id);
    END IF;
END $$;

-- The daily sweep: up to p_batch users with something due, one transaction. Call until users < p_batch.
CREATE FUNCTION public.expire_due_lots(p_batch integer DEFAULT 1000)
RETURNS TABLE (users integer, lots integer, credits bigint, rolled_over bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    u uuid;
    r record;
BEGIN
    users := 0; lots := 0; credits := 0; rolled_over := 0;
    IF p_batch IS NULL OR p_batch NOT BETWEEN 1 AND 100000 THEN
        RAISE EXCEPTION 'batch must be 1 to 100000, got %', p_batch USING ERRCODE = 'CR004';
    END IF;
    FOR u IN SELECT b.user_id FROM public.points_balances b WHERE b.next_expiry <= now()
              ORDER BY b.next_expiry LIMIT p_batch FOR UPDATE SKIP LOCKED LOOP
        SELECT * INTO r FROM public.expire_lots(u);
        users := users + 1;
        lots := lots + r.lots;
        credits := credits + r.credits;
        rolled_over := rolled_over + r.rolled_over;
    END LOOP;
    RETURN NEXT;
END $$;

-- A balance read that never shows expired credits: expires what is due first.
CREATE FUNCTION public.current_balance(p_user_id uuid)
RETURNS TABLE (balance bigint, reserved bigint, spendable bigint, lifetime_earned bigint, lifetime_spent bigint,
               next_expiry timestamptz, updated_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    IF p_user_id IS NULL THEN
        RAISE EXCEPTION 'user id is required' USING ERRCODE = 'CR004';
    END IF;
    PERFORM public.expire_lots_if_due(p_user_id);
    RETURN QUERY SELECT b.balance, b.reserved, b.balance - b.reserved, b.lifetime_earned, b.lifetime_spent,
                        b.next_expiry, b.updated_at
                   FROM public.points_balances b WHERE b.user_id = p_user_id;
END $$;

-- ------------------------------------------------------------------------------------------------ refunds

-- Return a failed generation's credits to the lots it drew on: once per deduction (key
-- 'refund:<transaction id>'), never more than it charged. Default: all of it. A retry answers
-- duplicate = true; a second refund of another amount is refused (CR008). Credits that go back to a lot
-- which has expired meanwhile expire again at once (an `expiry` row right after the refund's).
CREATE FUNCTION public.refund_generation(p_transaction_id bigint, p_amount bigint DEFAULT NULL,
                                         p_description text DEFAULT NULL)
RETURNS TABLE (new_balance bigint, transaction_id bigint, duplicate boolean, refunded bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    d record;
    r record;
    v_key text;
    v_amount bigint;
    w record;
BEGIN
    IF p_transaction_id IS NULL OR p_transaction_id <= 0 THEN
        RAISE EXCEPTION 'a deduction''s transaction id is required' USING ERRCODE = 'CR004';
    END IF;
    SELECT t.id, t.user_id, t.amount, t.transaction_type INTO d
      FROM public.points_transactions t WHERE t.id = p_transaction_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no ledger row %', p_transaction_id USING ERRCODE = 'CR008';
    END IF;
    IF d.transaction_type <> 'generation_deduction' OR d.amount >= 0 THEN
        RAISE EXCEPTION 'ledger row % is a % of %, not a generation''s deduction: nothing to refund',
            p_transaction_id, d.transaction_type, d.amount USING ERRCODE = 'CR008';
    END IF;
    v_amount := coalesce(p_amount, -d.amount);
    IF v_amount <= 0 OR v_amount > -d.amount THEN
        RAISE EXCEPTION 'a refund of ledger row % must be 1 to the % credits it charged, got %',
            p_transaction_id, -d.amount, v_amount USING ERRCODE = 'CR008';
    END IF;
    v_key := 'refund:' || p_transaction_id;
    -- the user's balance row lock orders this against a concurrent refund of the same row
    PERFORM 1 FROM public.points_balances b WHERE b.user_id = d.user_id FOR UPDATE;
    SELECT t.id, t.amount, t.balance_after INTO r FROM public.points_transactions t WHERE t.idempotency_key = v_key;
    IF FOUND THEN
        IF p_amount IS NULL OR r.amount = v_amount THEN
            RETURN QUERY SELECT r.balance_after, r.id, true, r.amount;
            RETURN;
        END IF;
        RAISE EXCEPTION 'ledger row % was already refunded (% credits); a refund is made once', p_transaction_id,
            r.amount USING ERRCODE = 'CR008';
    END IF;
    SELECT * INTO w FROM public.ledger_apply(
        d.user_id, v_amount, 'refund',
        coalesce(left(p_description, 1000), format('refund of failed generation (ledger row %s)', p_transaction_id)),
        v_key, jsonb_build_object('refund_of', p_transaction_id));
    -- credits returned to a lot that has expired since expire with it now, not at the next operation
    PERFORM public.expire_lots_if_due(d.user_id);
    RETURN QUERY SELECT w.new_balance, w.transaction_id, w.duplicate, v_amount;
END $$;

-- ------------------------------------------------------------------------- the writers, expiry-aware

-- 003's ledger_apply with one addition: the user's due expiry is written off first.
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

    -- 011: no expired credit is spendable (nor shown in balance_after)
    PERFORM public.expire_lots_if_due(p_user_id);

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
            IF p_idempotency_key IS NOT NULL THEN
                RETURN QUERY SELECT * FROM public.ledger_replay(v_key, p_user_id, p_delta, p_transaction_type);
                IF FOUND THEN RETURN; END IF;
            END IF;
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

-- 008's fast path, carried forward: it is taken only while nothing of the user's is due to expire, and
-- it draws the first lot itself when that lot covers the amount (recorded in the row's lot_id: no
-- trigger call, no consumption row -- one HOT update more than 008).
CREATE OR REPLACE FUNCTION public.deduct_points(p_user_id uuid, p_amount bigint, p_transaction_type text,
                                                p_description text, p_idempotency_key text DEFAULT NULL,
                                                p_metadata jsonb DEFAULT '{}'::jsonb)
RETURNS TABLE (new_balance bigint, transaction_id bigint, duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_new bigint;
    v_id bigint;
    v_lot bigint;
BEGIN
    IF p_user_id IS NOT NULL AND p_amount > 0 AND length(p_idempotency_key) BETWEEN 1 AND 512 THEN
        UPDATE public.points_balances b
           SET balance = b.balance - p_amount, lifetime_spent = b.lifetime_spent + p_amount, updated_at = now()
         WHERE b.user_id = p_user_id
           AND b.reserved = 0
           AND b.balance >= p_amount
           AND (b.next_expiry IS NULL OR b.next_expiry > now())
           AND p_amount <= (SELECT s.value::bigint FROM public.ledger_settings s
                             WHERE s.name = 'max_operation_amount')
           AND EXISTS (SELECT 1 FROM public.ledger_transaction_types tt
                        WHERE tt.name = p_transaction_type AND tt.direction IN (0, -1))
        RETURNING b.balance INTO v_new;

        IF v_new IS NOT NULL THEN
            -- the first lot in consumption order, when it covers the whole amount (else the trigger draws)
            UPDATE public.points_lots l SET remaining = l.remaining - p_amount
             WHERE l.id = (SELECT x.id FROM public.points_lots x
                            WHERE x.user_id = p_user_id AND x.remaining > 0
                            ORDER BY x.priority, x.expires_at, x.id LIMIT 1)
               AND l.remaining >= p_amount
            RETURNING l.id INTO v_lot;
            INSERT INTO public.points_transactions AS t
                (user_id, amount, balance_after, transaction_type, description, idempotency_key, metadata, lot_id)
            VALUES (p_user_id, -p_amount, v_new, p_transaction_type, p_description, p_idempotency_key,
                    coalesce(p_metadata, '{}'::jsonb), v_lot)
            ON CONFLICT (idempotency_key) DO NOTHING
            RETURNING t.id INTO v_id;

            IF v_id IS NOT NULL THEN
                new_balance := v_new;
                transaction_id := v_id;
                duplicate := false;
                RETURN NEXT;
                RETURN;
            END IF;

            UPDATE public.points_balances b
               SET balance = b.balance + p_amount, lifetime_spent = b.lifetime_spent - p_amount
             WHERE b.user_id = p_user_id;
            UPDATE public.points_lots l SET remaining = l.remaining + p_amount WHERE l.id = v_lot;
            RETURN QUERY SELECT * FROM public.ledger_replay(p_idempotency_key, p_user_id, -p_amount,
                                                            p_transaction_type);
            RETURN;
        END IF;
    END IF;

    PERFORM public.ledger_validate(p_user_id, p_amount, p_transaction_type, (-1)::smallint, p_idempotency_key);
    RETURN QUERY SELECT * FROM public.ledger_apply(p_user_id, -p_amount, p_transaction_type, p_description,
                                                   p_idempotency_key, p_metadata);
END $$;

-- add_points gains the lot's terms; with the defaults it behaves as before (no expiry, default priority).
DROP FUNCTION public.add_points(uuid, bigint, text, text, text, jsonb);
CREATE FUNCTION public.add_points(p_user_id uuid, p_amount bigint, p_transaction_type text, p_description text,
                                  p_idempotency_key text DEFAULT NULL, p_metadata jsonb DEFAULT '{}'::jsonb,
                                  p_expires_at timestamptz DEFAULT NULL, p_priority integer DEFAULT NULL)
RETURNS TABLE (new_balance bigint, transaction_id bigint, duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_meta jsonb := coalesce(p_metadata, '{}'::jsonb);
BEGIN
    PERFORM public.ledger_validate(p_user_id, p_amount, p_transaction_type, 1::smallint, p_idempotency_key);
    IF p_priority IS NOT NULL AND p_priority NOT BETWEEN 0 AND 1000 THEN
        RAISE EXCEPTION 'priority must be 0 to 1000, got %', p_priority USING ERRCODE = 'CR004';
    END IF;
    IF v_meta ? 'lot' AND jsonb_typeof(v_meta -> 'lot') <> 'object' THEN
        RAISE EXCEPTION 'metadata.lot must be an object of lot terms' USING ERRCODE = 'CR004';
    END IF;
    IF p_expires_at IS NOT NULL OR p_priority IS NOT NULL THEN
        v_meta := jsonb_set(v_meta, '{lot}', coalesce(v_meta -> 'lot', '{}'::jsonb)
                  || jsonb_strip_nulls(jsonb_build_object('expires_at', p_expires_at, 'priority', p_priority)));
    END IF;
    RETURN QUERY SELECT * FROM public.ledger_apply(p_user_id, p_amount, p_transaction_type, p_description,
                                                   p_idempotency_key, v_meta);
END $$;

-- 003's reserve_points and capture_reservation with the lazy expiry: a hold never covers expired credits,
-- and a capture charges credits its hold protected even if their lot has expired since.
DO $$
DECLARE
    v_src text;
BEGIN
    SELECT pg_get_functiondef('public.reserve_points(uuid, bigint, text, integer, jsonb)'::regprocedure) INTO v_src;
    v_src := replace(v_src, E'    -- a retried call: the first hold, lock nothing\n',
                     E'    PERFORM public.expire_lots_if_due(p_user_id);  -- 011: no hold on expired credits\n'
                     || E'    -- a retried call: the first hold, lock nothing\n');
    IF v_src NOT LIKE '%expire_lots_if_due%' THEN
        RAISE EXCEPTION '011: reserve_points is not the one 003 wrote; update this migration';
    END IF;
    EXECUTE v_src;

    SELECT pg_get_functiondef('public.capture_reservation(text, bigint)'::regprocedure) INTO v_src;
    v_src := replace(v_src,
        E'    UPDATE public.points_balances b SET reserved = b.reserved - r.amount WHERE b.user_id = r.user_id;\n',
        E'    PERFORM public.expire_lots(r.user_id);  -- 011: while the hold still protects its credits\n'
        || E'    PERFORM set_config(''credits.capturing'', ''on'', true);\n'
        || E'    UPDATE public.points_balances b SET reserved = b.reserved - r.amount WHERE b.user_id = r.user_id;\n');
    v_src := replace(v_src,
        E'    UPDATE public.points_reservations x\n       SET status = ''captured''',
        E'    PERFORM set_config(''credits.capturing'', '''', true);\n'
        || E'    UPDATE public.points_reservations x\n       SET status = ''captured''');
    IF (length(v_src) - length(replace(v_src, 'credits.capturing', ''))) <> 2 * length('credits.capturing') THEN
        RAISE EXCEPTION '011: capture_reservation is not the one 003 wrote; update this migration';
    END IF;
    EXECUTE v_src;
END $$;

REVOKE EXECUTE ON FUNCTION
    public.points_lots_follow_ledger(),
    public.expire_lots(uuid),
    public.expire_lots_if_due(uuid),
    public.expire_due_lots(integer),
    public.current_balance(uuid),
    public.refund_generation(bigint, bigint, text),
    public.ledger_apply(uuid, bigint, text, text, text, jsonb),
    public.deduct_points(uuid, bigint, text, text, text, jsonb),
    public.add_points(uuid, bigint, text, text, text, jsonb, timestamptz, integer)
FROM PUBLIC;
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON public.points_lots, public.points_lot_consumptions FROM PUBLIC;
