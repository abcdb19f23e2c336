-- Credit lifecycle, part 1 (issue 6): transaction types, webhook events, plan changes.
--
-- What the webhook handler (ledger/subscriptions.py) needs to be safe against the billing system's
-- delivery habits -- late, twice, out of order -- and to leave evidence for the audit:
--
--   subscription_events          one row per processed event id: a retried event is answered from it
--                                (no-op); the event's own time (event_time) is kept apart from the time we
--                                recorded it (received_at); a stale event is recorded with outcome 'stale'.
--   subscription_event_refusals  events refused (unknown user, tier missing from the config, malformed):
--                                recorded in their own transaction, since the refusal rolls back the event's.
--   subscription_plan_changes    every upgrade (with its prorated grant) and pending downgrade, with the
--                                exact proration state that the next upgrade of the period continues from.
--
-- These tables are written only through the SECURITY DEFINER functions below (the service role reads
-- them; `credits migrate` grants it EXECUTE), like the ledger itself.

INSERT INTO public.ledger_transaction_types (name, direction) VALUES
    ('top_up', 1),        -- a purchased credit pack, under its payment's key
    ('plan_change', 1),   -- the prorated difference granted by a mid-period upgrade
    ('expiry', -1)        -- a lot's unspent credits written off at its expiry (sql/011)
ON CONFLICT (name) DO NOTHING;

CREATE TABLE public.subscription_events (
    event_id          text PRIMARY KEY CHECK (length(event_id) BETWEEN 1 AND 255),
    bestauth_user_id  uuid NOT NULL,
    subscription_id   uuid,
    event_time        timestamptz,                        -- when the billing system says it happened
    received_at       timestamptz NOT NULL DEFAULT now(), -- when we recorded it
    outcome           text NOT NULL CHECK (outcome IN ('applied', 'stale')),
    detail            text,
    payload           jsonb NOT NULL DEFAULT '{}'::jsonb, -- tier, cycle, status, period as sent
    result            jsonb NOT NULL DEFAULT '{}'::jsonb  -- what it did: grant, plan change, balance
);
-- the newest applied event of a user: what a later-arriving older event would overwrite
CREATE INDEX subscription_events_user_time_idx
    ON public.subscription_events (bestauth_user_id, event_time DESC) WHERE outcome = 'applied';

CREATE TABLE public.subscription_event_refusals (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id      text,
    bestauth_ref  text,          -- the user id as sent (it may not even be a UUID)
    event_time    timestamptz,
    reason        text NOT NULL CHECK (reason IN ('unknown_user', 'unknown_tier', 'invalid_event', 'conflict')),
    message       text NOT NULL,
    payload       jsonb NOT NULL DEFAULT '{}'::jsonb,
    received_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscription_event_refusals_received_idx ON public.subscription_event_refusals (received_at);
CREATE INDEX subscription_event_refusals_ref_idx ON public.subscription_event_refusals (bestauth_ref);

CREATE TABLE public.subscription_plan_changes (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id   uuid NOT NULL,
    bestauth_user_id  uuid NOT NULL,
    user_id           uuid NOT NULL,                 -- the points id a prorated grant goes to
    period_start      timestamptz NOT NULL,
    period_end        timestamptz NOT NULL,
    from_tier         text NOT NULL,
    from_cycle        text NOT NULL,
    to_tier           text NOT NULL,
    to_cycle          text NOT NULL,
    kind              text NOT NULL CHECK (kind IN ('upgrade', 'downgrade', 'downgrade_canceled')),
    changed_at        timestamptz NOT NULL,          -- the event's time (or when it was handled)
    effective_at      timestamptz NOT NULL,          -- upgrade: changed_at; downgrade: the period's end
    fraction_left     text,                          -- "p/q": share of the period ahead at changed_at
    proration         jsonb,                         -- the period's state after it: {"exact": "p/q", "granted": n}
    credits           bigint NOT NULL DEFAULT 0 CHECK (credits >= 0),
    transaction_id    bigint,                        -- the plan_change ledger row (NULL when 0 credits)
    idempotency_key   text NOT NULL UNIQUE,          -- also the ledger row's key when there is one
    event_id          text,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscription_plan_changes_period_idx
    ON public.subscription_plan_changes (subscription_id, period_start, id);

-- Evidence, like the ledger: never rewritten.
CREATE TRIGGER subscription_events_no_update_delete
    BEFORE UPDATE OR DELETE ON public.subscription_events
    FOR EACH ROW EXECUTE FUNCTION public.points_transactions_immutable();
CREATE TRIGGER subscription_event_refusals_no_update_delete
    BEFORE UPDATE OR DELETE ON public.subscription_event_refusals
    FOR EACH ROW EXECUTE FUNCTION public.points_transactions_immutable();
CREATE TRIGGER subscription_plan_changes_no_update_delete
    BEFORE UPDATE OR DELETE ON public.subscription_plan_changes
    FOR EACH ROW EXECUTE FUNCTION public.points_transactions_immutable();

-- Record a processed event (inside the handler's transaction). false when the id was already recorded:
-- the caller lost a race with a concurrent delivery of the same event and must roll back.
CREATE FUNCTION public.record_subscription_event(p_event_id text, p_bestauth_user_id uuid, p_subscription_id uuid,
                                                 p_event_time timestamptz, p_outcome text, p_detail text,
                                                 p_payload jsonb, p_result jsonb)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_inserted boolean;
BEGIN
    IF p_event_id IS NULL OR length(p_event_id) NOT BETWEEN 1 AND 255 OR p_bestauth_user_id IS NULL THEN
        RAISE EXCEPTION 'an event id of 1 to 255 characters and a user id are required' USING ERRCODE = 'CR004';
    END IF;
    INSERT INTO public.subscription_events AS e
        (event_id, bestauth_user_id, subscription_id, event_time, outcome, detail, payload, result)
    VALUES (p_event_id, p_bestauth_user_id, p_subscription_id, p_event_time, p_outcome, left(p_detail, 1000),
            coalesce(p_payload, '{}'::jsonb), coalesce(p_result, '{}'::jsonb))
    ON CONFLICT (event_id) DO NOTHING
    RETURNING true INTO v_inserted;
    RETURN coalesce(v_inserted, false);
END $$;

-- Record a refused event (its own transaction: the refusal rolled the event's back).
CREATE FUNCTION public.record_subscription_event_refusal(p_event_id text, p_bestauth_ref text,
                                                         p_event_time timestamptz, p_reason text, p_message text,
                                                         p_payload jsonb DEFAULT '{}'::jsonb)
RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = '' AS $$
    INSERT INTO public.subscription_event_refusals (event_id, bestauth_ref, event_time, reason, message, payload)
    VALUES (left(p_event_id, 255), left(p_bestauth_ref, 200), p_event_time, p_reason,
            left(coalesce(p_message, p_reason), 2000), coalesce(p_payload, '{}'::jsonb))
    RETURNING id;
$$;

-- Record a plan change (inside the handler's transaction, after its ledger row if any). Returns the row id,
-- or NULL when the key was already recorded (a retry: nothing is written twice).
CREATE FUNCTION public.record_plan_change(p_subscription_id uuid, p_bestauth_user_id uuid, p_user_id uuid,
                                          p_period_start timestamptz, p_period_end timestamptz,
                                          p_from_tier text, p_from_cycle text, p_to_tier text, p_to_cycle text,
                                          p_kind text, p_changed_at timestamptz, p_effective_at timestamptz,
                                          p_fraction_left text, p_proration jsonb, p_credits bigint,
                                          p_transaction_id bigint, p_idempotency_key text, p_event_id text)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_id bigint;
BEGIN
    IF p_idempotency_key IS NULL OR length(p_idempotency_key) NOT BETWEEN 1 AND 512 THEN
        RAISE EXCEPTION 'a plan change needs an idempotency key of 1 to 512 characters' USING ERRCODE = 'CR004';
    END IF;
    IF p_transaction_id IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM public.points_transactions t
             WHERE t.id = p_transaction_id AND t.user_id = p_user_id AND t.amount = p_credits
               AND t.transaction_type = 'plan_change') THEN
        RAISE EXCEPTION 'ledger row % is not this plan change''s grant of % credits', p_transaction_id, p_credits
            USING ERRCODE = 'CR004';
    END IF;
    INSERT INTO public.subscription_plan_changes AS c
        (subscription_id, bestauth_user_id, user_id, period_start, period_end, from_tier, from_cycle, to_tier,
         to_cycle, kind, changed_at, effective_at, fraction_left, proration, credits, transaction_id,
         idempotency_key, event_id)
    VALUES (p_subscription_id, p_bestauth_user_id, p_user_id, p_period_start, p_period_end, p_from_tier,
            p_from_cycle, p_to_tier, p_to_cycle, p_kind, p_changed_at, p_effective_at, p_fraction_left,
            p_proration, coalesce(p_credits, 0), p_transaction_id, p_idempotency_key, left(p_event_id, 255))
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING c.id INTO v_id;
    RETURN v_id;
END $$;

REVOKE EXECUTE ON FUNCTION
    public.record_subscription_event(text, uuid, uuid, timestamptz, text, text, jsonb, jsonb),
    public.record_subscription_event_refusal(text, text, timestamptz, text, text, jsonb),
    public.record_plan_change(uuid, uuid, uuid, timestamptz, timestamptz, text, text, text, text, text, timestamptz,
                              timestamptz, text, jsonb, bigint, bigint, text, text)
FROM PUBLIC;
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON public.subscription_events, public.subscription_event_refusals,
    public.subscription_plan_changes FROM PUBLIC;
