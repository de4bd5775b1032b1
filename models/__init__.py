"""deepaudit.models"""
