"""deepaudit.infra"""
